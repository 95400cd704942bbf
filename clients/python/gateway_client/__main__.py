"""`python -m gateway_client ask "prompt"`: the same as the `gateway-client` command."""

import sys

from gateway_client._cli import main

sys.exit(main())
