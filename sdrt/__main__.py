"""`python -m sdrt` is the `sdrt` command."""
from sdrt.cli import main

raise SystemExit(main())
