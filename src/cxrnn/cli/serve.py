"""``cxrnn serve``: the HTTP API and web page over one model file."""

from __future__ import annotations

from pathlib import Path

import typer

from cxrnn.cli.common import ACCEPT_NON_CHEST_HELP, acquisition_policy, app, fail, in_range, out_console
from cxrnn.training.config import above, at_least, within


@app.command()
def serve(
    model: Path = typer.Argument(..., help="model.pt of a run."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, callback=in_range(within(1, 65535))),
    runtime: str = typer.Option("torch", help="torch or onnx (onnxruntime, exported at start)."),
    max_mb: float = typer.Option(20.0, help="Largest upload in MB (413 beyond).", callback=in_range(above(0))),
    batch: int = typer.Option(8, help="Micro-batching: most requests per forward pass (1: off).",
                              callback=in_range(at_least(1))),
    batch_ms: float = typer.Option(10.0, help="Micro-batching: longest wait for more requests, in ms.",
                                   callback=in_range(at_least(0))),
    timeout_s: float = typer.Option(30.0, help="Per-request time limit in seconds, from the first byte, upload "
                                    "included (408 if the upload is not complete by then, 504 beyond).",
                                    callback=in_range(above(0))),
    docs: bool = typer.Option(False, "--docs/--no-docs", help="Serve /docs (Swagger UI) from bundled assets, no "
                              "CDN. /openapi.json is always served."),
    accept_non_chest: bool = typer.Option(False, "--accept-non-chest", help=ACCEPT_NON_CHEST_HELP),
    device: str = typer.Option("cpu", help="cpu or cuda (torch runtime)."),
    precision: str = typer.Option("fp32", help="fp32 or bf16 autocast (torch runtime)."),
) -> None:
    """Serve the model: web page at /, POST /v1/predict and /v1/explain, GET /v1/model, /healthz, /openapi.json.

    uvicorn closes idle keep-alive connections after 5 s; it has no limit on how long request headers take.
    """
    import uvicorn

    from cxrnn.serve.app import create_app

    try:
        api = create_app(model, runtime=runtime, max_mb=max_mb, batch=batch, batch_ms=batch_ms, timeout_s=timeout_s,
                         device=device, precision=precision, docs=docs,
                         acquisition=acquisition_policy(accept_non_chest))
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    out_console.print(f"serving {api.state.service.bundle.describe()} on http://{host}:{port}/ "
                      f"(runtime {runtime}; research use only, not a medical device)", highlight=False)
    uvicorn.run(api, host=host, port=port, log_level="info")
