"""The ``unialign`` command. Exit codes: 0 success, 1 error (one line saying what is wrong), 2 usage
error, 130 interrupted. Commands live one group per module; this file only assembles them."""
from __future__ import annotations

import sys

import typer

from . import benchmark, curate, data, export, fuse, report, run, select, serve

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Align frozen unimodal encoders into one multimodal, CLIP-style model on cached features.")

for name, fn in [("run", run.run_command), ("train", run.train_command), ("eval", run.eval_command),
                 ("recipes", run.recipes_command), ("data", data.data_command), ("extract", data.extract_command),
                 ("select", select.select_command), ("curate", curate.curate_command),
                 ("index", serve.index_command), ("serve", serve.serve_command), ("report", report.report_command),
                 ("export", export.export_command),
                 ("benchmark", benchmark.benchmark_command)]:
    app.command(name)(fn)
app.add_typer(fuse.app, name="fuse")


def main() -> None:
    """Entry point: library errors become one line and exit code 1."""
    from unialign.errors import UnialignError

    try:
        app(standalone_mode=False)
    except (UnialignError, ValueError, OSError, ArithmeticError) as e:  # + unreadable paths, diverged training
        typer.secho(f"error: {' '.join(str(e).split())}", err=True, fg="red")  # always one line
        sys.exit(1)
    except KeyboardInterrupt:
        typer.secho("interrupted; run the same command again to resume where it stopped", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # usage errors arrive as click exceptions (typer vendors its own click)
        if hasattr(e, "show") and hasattr(e, "exit_code"):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        raise


if __name__ == "__main__":
    main()
