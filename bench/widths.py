"""How wide %shapes and %summary print for Transformers models, tiny and full-size, in characters.

    python bench/widths.py [--width 120] [--only gpt2,llama,bert]

Models are built from their configs with random weights (tiny ones for real, full-size ones on the
meta device: no download, no memory). Prints the widest line of the text form IPython shows
(`_repr_pretty_`, fitted to --width, as `%config TorchMagics.text_width` does) and of `print(t)`
(every full value), and the number of lines. The browser widths of the same tables are measured
by tests/frontend/test_browser.py (artifacts/frontend/widths.json)."""
from __future__ import annotations

import argparse
import os
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128),
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128),
    "bert": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128),
}


def build(kind: str, tiny: bool):
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, **(TINY[kind] if tiny else {}))
    cls = AutoModel if kind == "bert" else AutoModelForCausalLM
    if tiny:
        return cls.from_config(config)
    with torch.device("meta"):
        return cls.from_config(config)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=120, help="TorchMagics.text_width (the terminal's width)")
    parser.add_argument("--only", default="gpt2,llama,bert")
    opts = parser.parse_args()
    warnings.filterwarnings("ignore")
    import transformers
    from IPython.core.interactiveshell import InteractiveShell

    transformers.logging.set_verbosity_error()
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "torchmagic")
    if ip.find_cell_magic("trainstep") and "text_width" in ip.magics_manager.registry["TorchMagics"].trait_names():
        ip.run_line_magic("config", f"TorchMagics.text_width = {opts.width}")
    ip.run_cell("import torch; ids = torch.randint(0, 128, (1, 16))")
    print(f"{'model':13} {'magic':20} {'shown':>6} {'print()':>8} {'lines':>6}")
    for kind in opts.only.split(","):
        for tiny in (True, False):
            ip.user_ns["m"] = build(kind, tiny)
            for line in ("%shapes m ids", "%summary m ids", "%summary m"):
                result = ip.run_line_magic(line.split()[0][1:], " ".join(line.split()[1:]))
                shown = ip.display_formatter.format(result)[0]["text/plain"].splitlines()
                full = str(result).splitlines()
                print(f"{kind + (' tiny' if tiny else ' full'):13} {line:20} {max(map(len, shown)):6} "
                      f"{max(map(len, full)):8} {len(shown):6}")


if __name__ == "__main__":
    main()
