"""The site hook's activation quantizer: a NaN token comes out NaN, the others finite."""

from catjax.core.quant import activation_config
from catjax.ptq.hooks import SiteHook, fake_quantize_ste
from operands import check_nan_case, nan_cases


@nan_cases(rows={
    "fake_quantize_ste": lambda x: fake_quantize_ste(x, activation_config(4), ste=True),
    "SiteHook": lambda x: SiteHook.uniform(("attn_in",), activation_config(4))("attn_in", x, None)[0],
})
def test_a_nan_token_quantizes_to_nan(f, bad, token):
  check_nan_case(f, bad, token)
