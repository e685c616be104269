"""`hybrid(run)`: texture and CNN features of every split of the run's records, classifiers per label, the test
comparison with the CNN alone; what `cxrkeras hybrid` calls."""

import os
from collections import OrderedDict

from cxrkeras.errors import ConfigError

MAX_BATCH = 4096


def hybrid(run, records_dir=None, out_dir=None, classifier="logistic", params=None, equalize="hist", batch_size=32,
           n_boot=1000, seed=0, log=print):
    """Returns the result dict (settings, labels, sets: {texture, hybrid, cnn}: auc, at_thresholds, classifiers);
    writes hybrid.json and hybrid.md to out_dir (default <run>/hybrid)."""
    from cxrkeras.constants import EQUALIZE, SPLITS
    from cxrkeras.hybrid.classify import CLASSIFIERS, compare_with_cnn, evaluate_sets, format_table, write_result
    from cxrkeras.hybrid.extract import extract_split
    from cxrkeras.hybrid.texture import TextureParams
    from cxrkeras.runs import load_source

    params = params or TextureParams()
    if classifier not in CLASSIFIERS:
        raise ConfigError(f"unknown classifier {classifier!r}; choose one of {', '.join(CLASSIFIERS)}")
    if equalize is not None and equalize not in EQUALIZE:
        raise ConfigError(f"unknown equalize {equalize!r}: choose hist or clahe")
    if not 1 <= int(batch_size) <= MAX_BATCH:
        raise ConfigError(f"batch_size must be in [1, {MAX_BATCH}], got {batch_size}")
    source = load_source(run)
    records_dir = records_dir or source.records_dir
    if not records_dir:
        raise ConfigError(f"{run}: the run names no records folder; pass --records")
    log(f"model {source.model_path or source.model.name}; records {records_dir}; texture from the "
        f"{equalize or source.equalize or 'un'}-equalised image at {params.size} px")
    splits = {s: extract_split(source, records_dir, s, params, equalize, batch_size, log) for s in SPLITS}
    test_probs = {}
    sets = evaluate_sets(splits, list(source.labels), classifier, n_boot=n_boot, seed=seed, test_probs=test_probs)
    result = OrderedDict(
        settings=OrderedDict(model=source.model_path, records=os.path.abspath(records_dir), classifier=classifier,
                             texture=params.__dict__, equalize=equalize, n_boot=int(n_boot), seed=int(seed),
                             hog_dim=params.hog_dim, lbp_dim=params.lbp_dim,
                             cnn_dim=int(splits["test"]["embedding"].shape[1])),
        labels=list(source.labels), n_test=len(splits["test"]["image_ids"]), sets=sets)
    out_dir = out_dir or os.path.join(source.run_dir or os.path.dirname(source.model_path or "."), "hybrid")
    log(format_table(result))
    result["comparisons"] = compare_with_cnn(splits, test_probs, list(source.labels), out_dir, n_boot=n_boot,
                                             seed=seed, log=log)
    json_path, text_path = write_result(result, out_dir)
    log(f"written: {json_path}, {text_path}")
    return result
