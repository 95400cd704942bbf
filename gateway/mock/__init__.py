"""The built-in fake upstream: answers, knobs, wire formats and the server (see `upstream`)."""

from gateway.mock.upstream import *  # noqa: F403
from gateway.mock.upstream import __all__ as __all__
