"""The studies that read a finished run and answer one question each, one folder per study: pure
parts (numpy / torch, tested without a cluster) beside one `study.py` that reads the run directory,
runs what is needed on Ray and writes `<run>/<study>/`.

    replay/       does replay by predicted forgetting protect what fine-tuning forgets? (Jin & Ren 2024)
    exact_match/  binary forgetting: does greedy generation still give the reference answer?
    forecast/     forecasting forgetting from representations of tasks and examples
    flatness/     loss-landscape sharpness of each model against its forgetting (Li et al. 2024)
    iv/           instruction vectors and IV-guided fine-tuning (Jiang et al. 2024)
    scaling/      scaling laws of forgetting over fine-tuning steps (Kalajdzievski 2024)
    sizes.py      one run per base-model size, and the size sweep's summary
"""
