"""`python -m catjax ...` is the `catjax` command."""

from catjax.app.cli import main

raise SystemExit(main())
