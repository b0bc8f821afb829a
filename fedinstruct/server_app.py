"""fedinstruct ServerApp: compose the config, choose the method, run the rounds."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedinstruct.compose import config_from_run_config, to_container
from fedinstruct.config import RunConfig
from fedinstruct.logs import setup_logging
from fedinstruct.methods.base import server_method
from fedinstruct.server.loop import FederatedRun
from fedinstruct.server.output import RunOutput
from fedinstruct.server.resume import check_output_dir

log = logging.getLogger(__name__)

def run_server(grid: Grid, cfg: RunConfig) -> RunOutput:
    """Run a whole federation on `grid` with a validated config."""
    setup_logging()
    check_output_dir(cfg)  # before any model loads and anything is written
    method = server_method(cfg)  # a config that cannot run fails here, before any output
    rounds = FederatedRun
    if cfg.privacy.secure_aggregation:  # the train exchange and the sum through Flower's SecAgg+
        from fedinstruct.privacy.secagg_server import secure_run

        rounds = secure_run(cfg)  # refuses what SecAgg+ cannot run
    output = RunOutput(cfg.output_dir)
    with output.lock(wait=60):  # a second run on this folder fails, naming the holder's pid
        output.save_config(to_container(cfg))
        log.info(
            "fedinstruct: strategy=%s selection=%s model=%s rounds=%d -> %s",
            cfg.strategy.name,
            cfg.selection.name,
            cfg.model.name_or_path,
            cfg.num_rounds,
            output.folder,
        )
        rounds(cfg, grid, method, output).run()
    return output


def make_server_app(cfg: RunConfig | None = None) -> ServerApp:
    """A ServerApp for `cfg`, or (None) one that reads Flower's run_config."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg if cfg is not None else config_from_run_config(context.run_config))

    return server_app


app = make_server_app()
