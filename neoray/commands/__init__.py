"""The command-line glue of every ``neoray`` subcommand, and nothing else: each module defines
``add_arguments(parser)`` and ``run(args) -> int`` and calls into the package that does the work.

Exit status, the same for every command (README, "Exit status"): 0 success; 1 failure: what the command
was given cannot be used (a config, a path, a file, a cluster), the run failed, or a check found problems
(``check``, ``prepare --strict``); 2 the command line itself is wrong (argparse's code); 130 interrupted
(Ctrl-C); 143 stopped by SIGTERM, which does what Ctrl-C does (neoray.interrupts). A user's mistake is one line
on stderr, never a traceback."""

EXIT_OK = 0
EXIT_FAILED = 1  # bad input (config, path, file, cluster), a failed run, or problems found by a check
EXIT_USAGE = 2  # the command line itself (argparse's own code)
EXIT_INTERRUPTED = 130  # Ctrl-C: the shell's code for SIGINT
EXIT_TERMINATED = 143  # SIGTERM (a scheduler stopping the job): 128 + 15, handled as Ctrl-C is


def program(argv0: str) -> list[str]:
    """How the user started this command, for a command line to print back (a resume command): ``neoray`` for
    the installed script and for ``python -m neoray.cli``, ``python SCRIPT.py`` for a script such as
    experiments/sweep_lr.py."""
    name = argv0.replace("\\", "/").rsplit("/", 1)[-1]
    if argv0.replace("\\", "/").endswith(("neoray/cli.py", "neoray/__main__.py")) or name == "neoray":
        return ["neoray"]
    return ["python", argv0] if argv0.endswith(".py") else [name]
