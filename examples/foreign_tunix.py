"""CAT W4A4 on tunix's Llama3, a Flax model catjax did not write: load, quantize by rules
over module paths, perplexity. Needs google-tunix (`pip install google-tunix`).

    python examples/foreign_tunix.py
"""

import math
import tempfile

import catjax
from catjax.analysis import token_nll
from catjax.app import load_pretrained, text_windows
from catjax.models import save_hf, tunix

own, tokenizer, _ = load_pretrained("smollm2-135m")           # fetched once, cached
folder = tempfile.mkdtemp()
save_hf(own, folder, tokenizer=tokenizer)                     # a Hugging Face folder
model = tunix.load_tunix(folder)                              # tunix's Llama3 (nnx.Module)
calib = text_windows(tokenizer, "wiki-calib", seqlen=512, max_tokens=8 * 512).tokens
heldout = text_windows(tokenizer, "wiki-eval", seqlen=512, max_tokens=4096).tokens

rule = catjax.Rule(r"layers/\d+/.*", catjax.Recipe(method="cat", block_size=64))  # W4A4
quantized = catjax.quantize(model, rule, [w[None] for w in calib], forward=tunix.forward)
for name, m in (("fp", model), ("cat k=64 W4A4", quantized)):
  nll = [float(token_nll(tunix.forward(m, heldout[i:i + 2]), heldout[i:i + 2]).mean())
         for i in range(0, len(heldout), 2)]
  print(f"{name}: perplexity {math.exp(sum(nll) / len(nll)):.2f}")
