"""``python -m cxrnn ...`` (and ``torchrun ... -m cxrnn ...``) run the command line."""

from cxrnn.cli import app

if __name__ == "__main__":
    app(prog_name="cxrnn")
