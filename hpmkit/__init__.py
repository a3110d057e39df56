"""What evaluate.py and finetune.py stand on, one module for each thing (hpm.py, the head, stays
a single torch-only file at the top, to be copied):

    loading   models, data, head checkpoints, atomic files, one-line CLI errors, progress
    dpnp      the Adv-DPNP head (a control of the fine-tuning study)
    attacks   the attacks AutoAttack lacks, and the one way the library's are called
    chunks    many fixed batches at once, each with the random numbers it gets alone
    jobs      an attack over all batches of a row, resumable; --save-adv
    ranks     torchrun: processes share the chunks, ledgers, one results file
    gpu       chunks that fit in GPU memory; --compile
    checks    the gradient-masking checks
    config    attack names, flags checked, the fixed subset, resume identity
    report    notes, tables, the description of a run
    theory    the paper's sensitivity analysis, Eq. 3-13 (numpy, scipy)

No module here imports a script (evaluate.py, finetune.py, the experiments).
"""
