"""The shared strategies draw what the property tests need: windows in which every compressed head drops tokens."""

from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import attention_inputs, plans

from fkv_compile.plan import DENSE
from fkv_compile.semantics import keep_mask


def test_most_examples_compress_in_every_compressed_head(capsys):
    compresses = []

    @settings(max_examples=200, derandomize=True, database=None)
    @given(st.data())
    def draw(data):
        plan = data.draw(plans())
        q, k, _ = data.draw(attention_inputs(plan))
        mask = keep_mask(k, plan, 0, q.shape[2])
        heads = [h for h, role in enumerate(plan.roles[0]) if role != DENSE]
        compresses.append(bool(heads) and all(not bool(mask[:, h].all()) for h in heads))

    draw()
    fraction = sum(compresses) / len(compresses)
    with capsys.disabled():
        print(f"\n{fraction:.0%} of {len(compresses)} drawn examples compress in every compressed head")
    assert fraction >= 0.6, f"only {fraction:.0%} of the examples compress: the property tests see too little"
