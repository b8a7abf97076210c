"""`python -m catjax ...` is the `catjax` command."""

from catjax.cli import main

raise SystemExit(main())
