"""``python -m mu_fast.cli ...``: the ``mu-fast`` entry point (``mu_fast.cli.main``)."""

from mu_fast.cli import main

if __name__ == "__main__":
    main()
