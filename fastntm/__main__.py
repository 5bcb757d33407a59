"""``python -m fastntm``: the same command as ``fastntm`` (so that ``torchrun -m fastntm`` works)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
