"""`python -m pdserve` runs the same console script as `pdserve`."""

from pdserve.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
