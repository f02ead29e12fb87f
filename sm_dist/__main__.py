"""`python -m sm_dist ...`: the entrypoint for `ray job submit`."""

from sm_dist.cli import main

if __name__ == "__main__":
    main()
