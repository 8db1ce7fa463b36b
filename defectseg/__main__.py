"""``python -m defectseg`` is the same as the ``defectseg`` command."""

from defectseg.cli import main

if __name__ == "__main__":  # pragma: no cover - exercised through the CLI tests
    raise SystemExit(main())
