"""``backend="forcing_kv"`` resolves through the installed entry point in a process that never imported us."""

import subprocess
import sys
import textwrap


def test_backend_resolves_in_a_fresh_process(tmp_path):
    script = textwrap.dedent(
        """
        import sys, torch
        assert "fkv_compile" not in sys.modules
        class Attn(torch.nn.Module):
            def forward(self, q, cache_k, cache_v, end: int):
                cache_k[:, end - 4:end] = q.transpose(1, 2)
                return torch.nn.functional.scaled_dot_product_attention(
                    q, cache_k[:, :end].transpose(1, 2), cache_v[:, :end].transpose(1, 2))
        plan_path = sys.argv[1]
        m = torch.compile(Attn(), backend="forcing_kv", options={"plan": plan_path, "lowering": "eager"})
        q = torch.randn(1, 2, 4, 8)
        out = m(q, torch.randn(1, 20, 2, 8), torch.randn(1, 20, 2, 8), 20)
        import fkv_compile
        rep = fkv_compile.report(m, print_table=False)
        assert [s.action for s in rep.sites] == ["rewritten"], rep.sites
        assert rep.layers[0].kept_tokens == 12.0, rep.layers
        print("OK", tuple(out.shape))
        """
    )
    from fkv_compile import HeadPlan

    plan_path = tmp_path / "plan.json"
    HeadPlan.uniform("static", num_layers=1, num_heads=2, frame_tokens=4, chunk_frames=1).save(plan_path)
    result = subprocess.run([sys.executable, "-c", script, str(plan_path)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK (1, 2, 4, 8)" in result.stdout


def test_a_model_without_cache_attention_compiles_with_no_options_exactly_as_inductor():
    script = textwrap.dedent(
        """
        import sys, torch
        assert "fkv_compile" not in sys.modules
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
        x = torch.randn(4, 16)
        ours = torch.compile(model, backend="forcing_kv")(x)
        torch._dynamo.reset()
        theirs = torch.compile(model, backend="inductor")(x)
        assert torch.equal(ours, theirs), (ours - theirs).abs().max()
        print("OK bit-identical")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK bit-identical" in result.stdout
