"""``python -m controller`` runs the ``streamsaga`` command."""

from controller.cli import main

raise SystemExit(main())
