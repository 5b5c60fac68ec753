"""``python -m gradlab``: the same entry point as the ``gradlab`` console script."""

from gradlab_cli.main import main

if __name__ == "__main__":
    main()
