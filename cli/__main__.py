"""`python -m cli ...` runs the `charrnn` command line (the console script re-executes through this)."""

from cli.main import app

app(prog_name="charrnn")
