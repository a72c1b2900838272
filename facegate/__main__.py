"""``python -m facegate``: the same command as the ``facegate`` script (no installed script needed)."""

from facegate.cli import main

if __name__ == "__main__":
    main(prog_name="facegate")
