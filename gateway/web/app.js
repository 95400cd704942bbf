// The demo page's code (index.html). Answers stream in as Markdown and are rendered as they
// grow. An answer is untrusted input (a prompt injection can make a model write anything), so:
// raw HTML in it is shown as the text it is, never parsed; marked turns the Markdown into HTML
// whose every attribute it escapes; DOMPurify keeps only an allow-list of tags, attributes and
// URL schemes of that; and the result is inserted as DOM nodes, never as an HTML string. The
// page's Content-Security-Policy (no inline script, Trusted Types) backs all of that up.
// What else a stream carries is untrusted too, and never HTML: the model's reasoning and the
// progress line are plain text (textContent), a source is a link only when its URL is http(s),
// and its title is text.
import { GatewayClient, GatewayError } from "/js/index.js";
import { Marked } from "/vendor/marked/marked.esm.js";

/** DOMPurify, from the classic script index.html loads before this module. */
const purifier = globalThis.DOMPurify;
/** Without a working sanitiser, answers are shown as plain text, never as unsanitised HTML. */
const canSanitize = Boolean(purifier?.isSupported);

const $ = (id) => document.getElementById(id);
const statusEl = $("status");
const answersEl = $("answers");
const questionEl = $("question");
const cardTemplate = $("card-template");
const wsUrl = new URL("/v1/ws", location.href);
wsUrl.protocol = wsUrl.protocol === "https:" ? "wss:" : "ws:";

if (document.querySelector('meta[name="gateway-upstream"]')?.content === "simulated") {
  $("simulated").hidden = false;
}

const STATUS_TEXT = {
  connecting: "Connecting…",
  open: "Connected",
  reconnecting: "Reconnecting…",
  idle: "Idle — reconnects when you ask",
  closed: "Disconnected",
};

// ---- Rendering an answer ------------------------------------------------------------------

/** What Markdown produces, and a few harmless inline tags models use; nothing that loads,
 * runs, styles or submits anything (no img, script, style, iframe, form, svg, math). */
const ALLOWED_TAGS = [
  "p", "br", "hr", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "code", "kbd",
  "samp", "em", "strong", "b", "i", "u", "s", "del", "ins", "mark", "small", "sub", "sup",
  "ul", "ol", "li", "dl", "dt", "dd", "table", "thead", "tbody", "tfoot", "tr", "th", "td",
  "caption", "a", "abbr", "span", "details", "summary", "input",
];
/** No id, name, class or style: an answer can neither clobber the page's globals nor pass for
 * a piece of the page's own interface. */
const ALLOWED_ATTR = ["href", "title", "align", "start", "colspan", "rowspan", "type", "checked", "disabled"];
const SAFE_URL = /^(?:https?:|mailto:)/i;
const HTTP_URL = /^https?:\/\//i;
const PURIFY_CONFIG = {
  ALLOWED_TAGS,
  ALLOWED_ATTR,
  ALLOWED_URI_REGEXP: SAFE_URL,
  ALLOW_DATA_ATTR: false,
  ALLOW_ARIA_ATTR: false,
  RETURN_DOM_FRAGMENT: true,
};
/** The upstream's citation markers: [1] is the answer's first source. */
const CITATION = /\[(\d+)\]/g;

const escapeHtml = (text) =>
  String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

const markdown = new Marked({ gfm: true, async: false });
markdown.use({
  renderer: {
    // Raw HTML that a model writes is shown, not rendered (as chat interfaces do): the reader
    // sees what the answer says, and no attribute of the answer's own ever reaches an HTML
    // parser (a parser that met an onerror= would at least report it against the CSP).
    html({ text, block }) {
      const shown = escapeHtml(block ? text.trim() : text);
      return block ? `<p>${shown.replaceAll("\n", "<br>")}</p>\n` : shown;
    },
    // An image in an answer becomes a link to it: loading what an answer names would tell that
    // server who reads the answer, and a model can be made to put the conversation in the URL.
    image({ href, text }) {
      return `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`;
    },
  },
});

/** The answer's Markdown as sanitised DOM nodes (a DocumentFragment). */
function markdownFragment(text) {
  if (!canSanitize) {
    const fragment = document.createDocumentFragment();
    const paragraph = document.createElement("p");
    paragraph.style.whiteSpace = "pre-wrap";
    paragraph.textContent = text;
    fragment.append(paragraph);
    return fragment;
  }
  const fragment = purifier.sanitize(markdown.parse(text).trim(), PURIFY_CONFIG);
  for (const link of fragment.querySelectorAll("a[href]")) {
    link.target = "_blank";
    link.rel = "noopener noreferrer nofollow";
  }
  for (const input of fragment.querySelectorAll("input")) {
    if (input.type === "checkbox") input.disabled = true; // a task list's box
    else input.remove();
  }
  return fragment;
}

/** The parts the page asks the gateway for besides the answer's text. */
const PARTS = ["reasoning", "sources", "progress"];

/** A citation marker: a link to its source when the source is known, else the bare number.
 * `sources` maps a marker's number to its URL. */
function citationMarker(number, sources, missing) {
  const sup = document.createElement("sup");
  sup.className = "cite";
  const url = sources.get(number);
  if (typeof url === "string" && HTTP_URL.test(url)) {
    const link = document.createElement("a");
    link.href = url;
    link.target = "_blank";
    link.rel = "noopener noreferrer";
    link.title = url;
    link.textContent = `[${number}]`;
    sup.append(link);
  } else {
    sup.textContent = `[${number}]`;
    sup.title = missing;
  }
  return sup;
}

/** Turn [n] markers in text (not in code, not in links) into citation markers. */
function linkCitations(root, citations, missing) {
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT, {
    acceptNode: (node) =>
      node.parentElement?.closest("code, pre, a") ? NodeFilter.FILTER_REJECT : NodeFilter.FILTER_ACCEPT,
  });
  const nodes = [];
  while (walker.nextNode()) nodes.push(walker.currentNode);
  for (const node of nodes) {
    const text = node.data;
    const parts = [];
    let last = 0;
    for (const match of text.matchAll(CITATION)) {
      parts.push(text.slice(last, match.index), citationMarker(Number(match[1]), citations, missing));
      last = match.index + match[0].length;
    }
    if (parts.length === 0) continue;
    parts.push(text.slice(last));
    node.replaceWith(...parts);
  }
}

/** One answer's view: text appended as it streams, and sources as they become known, are
 * rendered at most once per frame; a marker links to its source as soon as that is known. */
function answerView(element) {
  let text = "";
  let sources = new Map();
  let missing = "Its source has not arrived yet";
  let frame = 0;
  const paint = () => {
    frame = 0;
    const fragment = markdownFragment(text);
    linkCitations(fragment, sources, missing);
    element.replaceChildren(fragment);
    keepNewestInView();
  };
  const schedule = () => {
    if (!frame) frame = requestAnimationFrame(paint);
  };
  return {
    append(chunk) {
      text += chunk;
      schedule();
    },
    /** Sources known so far (number -> URL): markers that refer to them become links. */
    setSources(known) {
      sources = known;
      if (text) schedule();
    },
    /** The answer is over: render it now with the sources known then. */
    finish(finalText, finalSources, why) {
      if (frame) cancelAnimationFrame(frame);
      if (typeof finalText === "string") text = finalText;
      sources = finalSources;
      if (why) missing = why;
      paint();
    },
  };
}

/** The collapsible "Thinking" section: the model's reasoning as plain text, never HTML. It is
 * open while the model thinks and folds away when the answer starts, unless the reader opened
 * or closed it. */
function thinkingView(details) {
  const body = details.querySelector(".reasoning");
  const time = details.querySelector(".thinking-time");
  const text = document.createTextNode("");
  body.append(text);
  let began = 0;
  let touched = false;
  let over = false;
  details.querySelector("summary").addEventListener("click", () => {
    touched = true;
  });
  return {
    append(chunk) {
      // A <think> block's reasoning starts and ends with line breaks: not worth blank lines.
      const shown = text.length ? chunk : chunk.trimStart();
      if (!shown) return;
      if (!began) {
        began = performance.now();
        details.hidden = false;
        details.open = true;
        details.dataset.state = "thinking";
      }
      text.appendData(shown);
      if (details.open) body.scrollTop = body.scrollHeight;
    },
    /** The answer began (or the stream ended): thinking is over. */
    end() {
      if (!began || over) return;
      over = true;
      text.data = text.data.trimEnd();
      details.dataset.state = "done";
      time.textContent = ` · ${((performance.now() - began) / 1000).toFixed(1)} s`;
      if (!touched) details.open = false;
    },
  };
}

/** A progress step as one line of plain text. */
function stepText(step) {
  const list = (items) => (Array.isArray(items) ? items.filter((x) => typeof x === "string").join(", ") : "");
  const readable = (url) => {
    try {
      const { hostname, pathname } = new URL(url);
      return hostname + (pathname === "/" ? "" : pathname);
    } catch {
      return String(url);
    }
  };
  switch (step?.kind) {
    case "search":
      return `Searching: ${list(step.queries) || "the web"}`;
    case "fetch":
      return `Reading: ${Array.isArray(step.urls) ? step.urls.map(readable).join(", ") : "a page"}`;
    case "code":
      return "Running code";
    case "thought":
      return typeof step.text === "string" && step.text ? `Thinking: ${step.text}` : "Thinking";
    default:
      return "Working";
  }
}

// ---- Layout: newest at the bottom, the page follows it -------------------------------------

/** Follow the newest answer unless the reader has scrolled up to read an older one. */
let following = true;
const atBottom = () =>
  window.innerHeight + window.scrollY >= document.documentElement.scrollHeight - 64;
addEventListener("scroll", () => { following = atBottom(); }, { passive: true });

function keepNewestInView() {
  if (following) window.scrollTo({ top: document.documentElement.scrollHeight, behavior: "instant" });
}

/** The row a new answer joins: the last one while any of its answers still streams (parallel
 * questions side by side), else a new row at the bottom. */
let currentTurn = null;
function turnForNewAnswer() {
  if (!currentTurn?.isConnected || !currentTurn.querySelector('.card[data-state="streaming"]')) {
    currentTurn = document.createElement("div");
    currentTurn.className = "turn";
    answersEl.append(currentTurn);
  }
  return currentTurn;
}

function removeCard(card) {
  const turn = card.parentElement;
  card.remove();
  if (turn && !turn.children.length) turn.remove();
}

/** A source's entry in a card's list, numbered as the answer's markers number it: a link when
 * its URL is http(s) (its title as text), else nothing. */
function sourceItem(index, url, title) {
  if (typeof url !== "string" || !HTTP_URL.test(url)) return null;
  let label;
  try {
    const { hostname, pathname } = new URL(url);
    label = hostname + pathname;
  } catch {
    return null;
  }
  const item = document.createElement("li");
  item.value = index;
  item.dataset.index = String(index);
  const link = document.createElement("a");
  link.href = url;
  link.target = "_blank";
  link.rel = "noopener noreferrer";
  link.textContent = typeof title === "string" && title ? title : label;
  item.append(link);
  return item;
}

/** Put a source into a card's list in marker order (the list grows while the answer streams). */
function addSource(list, index, url, title) {
  const item = sourceItem(index, url, title);
  if (!item) return;
  const after = [...list.children].find((li) => Number(li.dataset.index) > index);
  list.insertBefore(item, after ?? null);
}

// ---- The connection and the questions ------------------------------------------------------

let gw = null;

function connect(token) {
  gw?.close();
  gw = new GatewayClient(wsUrl, token ? { token } : {});
  gw.addEventListener("state", (event) => {
    let text = STATUS_TEXT[event.state];
    if (event.state === "reconnecting") {
      text = `Reconnecting (attempt ${event.attempt}, in ${(event.delayMs / 1000).toFixed(1)} s)…`;
    }
    if (event.state === "closed" && event.error) {
      text = `Disconnected: ${event.error.message}`;
      if (event.error.code === "unauthorized") showTokenPanel();
    }
    statusEl.dataset.state = event.state;
    statusEl.textContent = text;
  });
}

function showTokenPanel() {
  $("token-panel").hidden = false;
  $("token").focus();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  sessionStorage.setItem("gateway-token", token);
  $("token-panel").hidden = true;
  connect(token);
});

let cardCount = 0;

async function ask(question) {
  $("empty")?.remove();
  const n = ++cardCount;
  const card = cardTemplate.content.firstElementChild.cloneNode(true);
  const heading = card.querySelector("h2");
  heading.id = `q${n}`;
  heading.textContent = question;
  card.setAttribute("aria-labelledby", heading.id);
  const answerEl = card.querySelector(".answer");
  const sourcesEl = card.querySelector(".sources");
  const progressEl = card.querySelector(".progress");
  const outcomeEl = card.querySelector(".outcome");
  const stopButton = card.querySelector(".stop");
  const retryButton = card.querySelector(".retry");
  stopButton.setAttribute("aria-label", `Stop the answer to: ${question}`);
  turnForNewAnswer().append(card);
  following = true;
  keepNewestInView();

  const view = answerView(answerEl);
  const thinking = thinkingView(card.querySelector(".thinking"));
  /** Sources streamed so far: marker number -> URL. */
  const known = new Map();
  const controller = new AbortController();
  stopButton.addEventListener("click", () => controller.abort());
  const started = performance.now();
  const stream = gw.stream(question, { signal: controller.signal, parts: PARTS });
  card.dataset.streamId = stream.id;

  const finish = (state, text) => {
    card.dataset.state = state;
    answerEl.setAttribute("aria-busy", "false");
    outcomeEl.textContent = text;
    stopButton.hidden = true;
    progressEl.hidden = true;
    thinking.end();
    keepNewestInView();
  };
  try {
    for await (const part of stream.parts()) {
      switch (part.kind) {
        case "text":
          // The line says what the upstream is doing now: the answer's text means it is writing.
          thinking.end();
          progressEl.hidden = true;
          view.append(part.text);
          break;
        case "reasoning":
          thinking.append(part.text);
          break;
        case "sources":
          for (const source of part.sources) {
            if (!Number.isInteger(source?.index) || known.has(source.index)) continue;
            known.set(source.index, source.url);
            addSource(sourcesEl, source.index, source.url, source.title);
          }
          view.setSources(new Map(known));
          break;
        case "progress":
          progressEl.textContent = stepText(part.step);
          progressEl.hidden = false;
          break;
        default:
          break;
      }
    }
    const answer = await stream.result;
    // A gateway that streamed no sources still sends the upstream's citations with `done`.
    if (!known.size) {
      const titles = new Map(answer.searchResults.map((r) => [r.url, r.title]));
      answer.citations.forEach((url, i) => {
        known.set(i + 1, url);
        addSource(sourcesEl, i + 1, url, titles.get(url));
      });
    }
    view.finish(answer.text, known, "The upstream sent no source for this number");
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const tokens = Number.isInteger(answer.usage?.total_tokens) ? `, ${answer.usage.total_tokens} tokens` : "";
    finish("done", `Done in ${seconds} s${tokens}`);
  } catch (error) {
    // A stopped or failed answer keeps its text, rendered like a finished one: its markers link
    // to the sources that had arrived, the others stay bare numbers.
    view.finish(null, known, "The answer ended before this source arrived");
    if (error?.name === "AbortError") {
      finish("stopped", "Stopped");
    } else if (error instanceof GatewayError) {
      finish("error", `Error: ${error.message}`);
      if (error.retryable) {
        retryButton.hidden = false;
        retryButton.addEventListener("click", () => {
          removeCard(card);
          ask(question);
        });
      }
    } else {
      finish("error", `Error: ${error}`);
      throw error;
    }
  }
}

$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  const question = questionEl.value.trim();
  if (!question) return;
  questionEl.value = "";
  questionEl.focus();
  ask(question);
});

questionEl.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});

connect(sessionStorage.getItem("gateway-token"));
