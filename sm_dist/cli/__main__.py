"""`python -m sm_dist.cli ...`, the same as `python -m sm_dist ...`."""

from sm_dist.cli import main

if __name__ == "__main__":
    main()
