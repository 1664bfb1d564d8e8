"""Stage models: each model base.model / base.target name -> data/models/<name>/ (converted once, a cached DVC output)."""

from __future__ import annotations

import _workspace  # noqa: F401  (first: headline_bench from this workspace's src/)

# isort: split

import time

from headline_bench.errors import Skip, fail
from headline_bench.files import MODELS, read_json, write_json
from headline_bench.logs import log, setup_logging
from headline_bench.models.convert import convert
from headline_bench.settings import load_params


def main() -> None:
    setup_logging()
    params = load_params(required=["base", "models"])
    names = dict.fromkeys([params.base.model, params.base.target])
    for name in names:
        if name not in params.models:
            fail(f"params.yaml: model '{name}' is not defined under 'models' (known: {sorted(params.models)})")
        spec, out = params.models[name], MODELS / name
        recorded = spec.model_dump(exclude_unset=True)  # the keys params.yaml gives, as source.json has always kept them
        if (out / "source.json").exists() and read_json(out / "source.json").get("spec") == recorded:
            log.info("models: %s already built from the same spec -> %s", name, out)  # gpu-check passes share models; DVC empties data/models first
            continue
        start = time.perf_counter()  # logged, not written: a timing in source.json would change the cached output every run
        try:
            info = convert(name, spec, out, params.models)
        except Skip as e:
            fail(f"models: {name}: {e}")
        write_json(out / "source.json", {**info, "spec": recorded})
        log.info("models: %s -> %s (%s params, %.0f s)", name, MODELS / name, f"{info['params']:,}", time.perf_counter() - start)


if __name__ == "__main__":
    main()
