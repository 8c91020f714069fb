"""``python -m sockmap``: the ``sockmap`` command."""

from sockmap.cli.main import main

raise SystemExit(main())
