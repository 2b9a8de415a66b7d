"""`python -m charrnn ...` runs the command line (the console script re-executes through this)."""

from charrnn.cli import app

app(prog_name="charrnn")
