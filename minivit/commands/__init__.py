"""One module per `minivit` sub-command.

Each module defines ``add_parser(subparsers, name, help_text)`` (makes its parser with
``common.command_parser`` and registers its flags) and ``run(args) -> int`` (does the work,
returns the exit code).
``minivit.cli`` lists them in ``COMMANDS``.
"""
