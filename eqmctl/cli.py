"""The `eqmctl` Typer application. Each subcommand lives in its own module under
`eqmctl/commands/` and is registered below; those modules import torch lazily."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="eqmctl",
    help="Train and sample Equilibrium Matching video models that know real time: every frame "
    "carries its timestamp in seconds, so a model generates at any frame rate with motion at the right speed.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root() -> None:
    # An explicit callback keeps `eqmctl SUBCOMMAND` a group even while only one subcommand is
    # registered (Typer otherwise runs a lone command as the app itself, without its name).
    pass


# --- command registration (one line per subcommand) ---------------------------------------
from eqmctl.commands import probe as _probe  # noqa: E402

app.command("probe-fps")(_probe.probe_fps)
from eqmctl.commands import train as _train  # noqa: E402

app.command("train")(_train.train)
from eqmctl.commands import sample as _sample  # noqa: E402

app.command("sample")(_sample.sample)
from eqmctl.commands import inspect_embed as _inspect_embed  # noqa: E402

app.command("inspect-embed")(_inspect_embed.inspect_embed)
from eqmctl.commands import retime as _retime  # noqa: E402

app.command("retime")(_retime.retime)
from eqmctl.commands import cache as _cache  # noqa: E402

app.command("cache")(_cache.cache)
from eqmctl.commands import calibrate as _calibrate  # noqa: E402

app.command("calibrate")(_calibrate.calibrate)
# --- end of command registration ----------------------------------------------------------


def main() -> None:
    app()


if __name__ == "__main__":
    main()
