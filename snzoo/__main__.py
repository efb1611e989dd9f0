"""`python -m snzoo` starts the snzoo command."""

from snzoo_cli.main import main

if __name__ == "__main__":
    main()
