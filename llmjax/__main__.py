"""`python -m llmjax ...` is the `llmjax` command."""

import sys

from llmjax.cli import main

sys.exit(main())
