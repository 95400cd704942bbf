// The demo page's code (index.html). Answers stream in as Markdown and are rendered as they
// grow. An answer is untrusted input (a prompt injection can make a model write anything), so:
// raw HTML in it is shown as the text it is, never parsed; marked turns the Markdown into HTML
// whose every attribute it escapes; DOMPurify keeps only an allow-list of tags, attributes and
// URL schemes of that; and the result is inserted as DOM nodes, never as an HTML string. The
// page's Content-Security-Policy (no inline script, Trusted Types) backs all of that up.
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

/** A citation marker: a link to its source when the source is known, else the bare number. */
function citationMarker(number, citations, missing) {
  const sup = document.createElement("sup");
  sup.className = "cite";
  const url = citations[number - 1];
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

/** One answer's view: text appended as it streams is rendered at most once per frame. */
function answerView(element) {
  let text = "";
  let citations = [];
  let missing = "Its source arrives with the end of the answer";
  let frame = 0;
  const paint = () => {
    frame = 0;
    const fragment = markdownFragment(text);
    linkCitations(fragment, citations, missing);
    element.replaceChildren(fragment);
    keepNewestInView();
  };
  return {
    append(chunk) {
      text += chunk;
      if (!frame) frame = requestAnimationFrame(paint);
    },
    /** The answer is over: render it now with the sources known (none when it was stopped). */
    finish(finalText, finalCitations, why) {
      if (frame) cancelAnimationFrame(frame);
      if (typeof finalText === "string") text = finalText;
      citations = finalCitations;
      if (why) missing = why;
      paint();
    },
  };
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

function sourceLink(url, title) {
  const item = document.createElement("li");
  const link = document.createElement("a");
  link.href = url;
  link.target = "_blank";
  link.rel = "noopener noreferrer";
  const { hostname, pathname } = new URL(url);
  link.textContent = title || hostname + pathname;
  item.append(link);
  return item;
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
  const outcomeEl = card.querySelector(".outcome");
  const stopButton = card.querySelector(".stop");
  const retryButton = card.querySelector(".retry");
  stopButton.setAttribute("aria-label", `Stop the answer to: ${question}`);
  turnForNewAnswer().append(card);
  following = true;
  keepNewestInView();

  const view = answerView(answerEl);
  const controller = new AbortController();
  stopButton.addEventListener("click", () => controller.abort());
  const started = performance.now();
  const stream = gw.stream(question, { signal: controller.signal });
  card.dataset.streamId = stream.id;

  const finish = (state, text) => {
    card.dataset.state = state;
    answerEl.setAttribute("aria-busy", "false");
    outcomeEl.textContent = text;
    stopButton.hidden = true;
    keepNewestInView();
  };
  try {
    for await (const chunk of stream) view.append(chunk);
    const answer = await stream.result;
    view.finish(answer.text, answer.citations, "The upstream sent no source for this number");
    const titles = new Map(answer.searchResults.map((r) => [r.url, r.title]));
    for (const url of answer.citations) {
      if (typeof url === "string" && HTTP_URL.test(url)) sourcesEl.append(sourceLink(url, titles.get(url)));
    }
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const tokens = answer.usage ? `, ${answer.usage.total_tokens} tokens` : "";
    finish("done", `Done in ${seconds} s${tokens}`);
  } catch (error) {
    // The gateway sends an answer's sources with its end (`done`): a stopped or failed answer
    // keeps its text, rendered like a finished one, with its markers as bare numbers.
    const why = "The answer ended before its sources arrived";
    view.finish(null, [], why);
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
