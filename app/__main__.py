"""`python -m app`: the command line."""

from app.cli.commands import main

raise SystemExit(main())
