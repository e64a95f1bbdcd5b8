from core.dispatch import Planned, cut, plan
from core.settings import Settings
from core.specs import parse_items


def test_compatible_jobs_share_micro_batches_that_fit_the_budget(tmp_path):
    settings = Settings(data_dir=tmp_path)  # tiny-sd: 16 images of 64x64 per pass
    jobs = [Planned(f"j{i}", "tiny-sd|generate|64x64|4|7.5", 64 * 64, "bulk") for i in range(40)]
    batches = cut(jobs, settings)
    assert [len(b) for b in batches] == [16, 16, 8]
    assert [j.id for b in batches for j in b] == [f"j{i}" for i in range(40)]  # order kept


def test_incompatible_jobs_never_share_a_batch(tmp_path):
    settings = Settings(data_dir=tmp_path)
    jobs = [
        Planned("a", "tiny-sd|generate|64x64|4|7.5", 4096, "bulk"),
        Planned("b", "tiny-sd|generate|64x64|8|7.5", 4096, "bulk"),
        Planned("c", "tiny-sd|generate|64x64|4|7.5", 4096, "interactive"),
        Planned("d", "tiny-sd|generate|64x64|4|7.5", 4096, "bulk"),
    ]
    assert sorted(sorted(j.id for j in b) for b in cut(jobs, settings)) == [["a", "d"], ["b"], ["c"]]


def test_a_job_over_the_budget_runs_alone(tmp_path):
    settings = Settings(data_dir=tmp_path)
    budget = settings.models["lanczos-x4"].pixel_budget
    jobs = [Planned("big", "lanczos-x4|upscale|x4", budget * 2, "bulk"),
            Planned("small", "lanczos-x4|upscale|x4", 100, "bulk")]
    assert [[j.id for j in b] for b in cut(jobs, settings)] == [["big"], ["small"]]


def test_small_jobs_are_cut_at_the_job_cap_not_only_the_pixel_budget(tmp_path):
    # 8x8 upscales add 1,024 pixels each: lanczos-x4's budget alone would hold 16,384 of them.
    settings = Settings(data_dir=tmp_path)
    cap = settings.models["lanczos-x4"].max_jobs
    jobs = [Planned(f"j{i}", "lanczos-x4|upscale|x4", 32 * 32, "bulk") for i in range(2 * cap + 1)]
    batches = cut(jobs, settings)
    assert [len(b) for b in batches] == [cap, cap, 1]
    assert [j.id for b in batches for j in b] == [j.id for j in jobs]
    capped = Settings(data_dir=tmp_path, models={"lanczos-x4": {"task": "upscale", "engine": "lanczos", "max_jobs": 3}})
    assert [len(b) for b in cut(jobs[:7], capped)] == [3, 3, 1]


def test_plan_buckets_sizes_and_costs(tmp_path):
    settings = Settings(data_dir=tmp_path, check_weights_at_submit=False)  # realesrgan-x4 is not pulled here
    (g1, g2, g3, inp, up), errors = parse_items([
        {"custom_id": "1", "kind": "generate", "prompt": "x", "width": 512, "height": 512, "steps": 4},
        {"custom_id": "2", "kind": "generate", "prompt": "y", "width": 500, "height": 520, "steps": 4},
        {"custom_id": "3", "kind": "generate", "prompt": "y", "width": 512, "height": 512, "steps": 5,
         "num_images": 2},
        {"custom_id": "4", "kind": "inpaint", "mode": "fill", "image": "a" * 64, "mask": "b" * 64},
        {"custom_id": "5", "kind": "upscale", "image": "a" * 64},
    ], settings)
    assert errors == []
    assert plan(g1, settings)[0] == plan(g2, settings)[0]  # nearby sizes share a bucket
    assert plan(g3, settings) == ("tiny-sd|generate|64x64|5|7.5", 2 * 64 * 64)
    assert plan(inp, settings)[1] == 512 * 512
    upscaler = settings.default_models["upscale"]  # per device kind
    assert plan(up, settings, (100, 50)) == (f"{upscaler}|upscale|x4", 5000 * 16)  # output pixels
