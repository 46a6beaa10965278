"""``python -m untrac_pl.cli <command> ...``, the same as ``untrac-pl <command> ...``."""
from untrac_pl.cli import main

raise SystemExit(main())
