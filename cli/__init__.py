"""The `charrnn` command line, above the core (`charrnn`), the trainer (`training`) and the service (`app`)."""
