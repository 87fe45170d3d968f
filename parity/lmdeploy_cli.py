"""`parity lmdeploy -- ARGS`: lmdeploy's own command line (`serve api_server`, `chat`, `convert`, ...) run in this
process with parity's registration active.

lmdeploy has no option for a lora_config or for exporting attention biases; the registration
(`parity.disguise.register_lora_config`) is process-local. So a user who serves a disguise with the plain
`lmdeploy` command gets lmdeploy's hard-coded XComposer2 LoRA settings and loses the q/k/v biases, while this
command serves it with exactly the settings `parity run` verified. Every folder with a parity_lora_config.json
is affected; other models are not. On a machine without CUDA, lmdeploy's CPU-converter patches are active too
(`convert` works there; serving needs a GPU as always).
"""

from __future__ import annotations

import sys

from .errors import ParityInputError, one_line


def run_lmdeploy_cli(argv: list[str]) -> int:
    """Run `lmdeploy *argv` (a leading "--" is dropped) under the registration; its exit status."""
    args = list(argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        raise ParityInputError(
            "parity lmdeploy needs lmdeploy's own arguments after --, e.g. `parity lmdeploy -- serve api_server "
            "models/my-qwen2-plora-xc2` or `parity lmdeploy -- convert internlm-xcomposer2 DISGUISE --dst-path WS`."
        )
    from .deploy.compat import cpu_converter_patches, installed_lmdeploy_version

    if installed_lmdeploy_version() is None:
        raise ParityInputError("lmdeploy is not installed in this environment; `parity lmdeploy` runs its CLI "
                               "(pip install --no-deps lmdeploy==0.7.1, see the README).")
    from .disguise.lora import lora_config_registered

    saved = sys.argv
    with cpu_converter_patches(), lora_config_registered():
        try:
            sys.argv = ["lmdeploy", *args]
            from lmdeploy.cli import run

            run()
        except SystemExit as e:  # argparse (usage: 2, --help: 0) and lmdeploy's own exits
            code = e.code
            if code is None or isinstance(code, int):
                return int(code or 0)
            raise ParityInputError(f"lmdeploy {' '.join(args)} stopped: {code}") from None
        except (ParityInputError, KeyboardInterrupt):
            raise
        except ImportError as e:  # e.g. `serve` on an install that has only lmdeploy's converter needs
            raise ParityInputError(
                f"lmdeploy {' '.join(args)} needs the Python module {e.name or str(e)!r}, which is not installed in "
                "this environment. parity's setup installs what lmdeploy's converter needs; serving needs lmdeploy's "
                "full dependencies (pip install lmdeploy==0.7.1) and a CUDA GPU."
            ) from None
        except Exception as e:  # noqa: BLE001 - lmdeploy's failure, reported as one paragraph
            msg = one_line(e)[:600] or type(e).__name__
            raise ParityInputError(
                f"lmdeploy {' '.join(args)} failed ({type(e).__name__}: {msg}). The command ran lmdeploy "
                f"{installed_lmdeploy_version()}'s own CLI with parity's registration active; check its arguments "
                "(`parity lmdeploy -- --help`)."
            ) from None
        finally:
            sys.argv = saved
    return 0
