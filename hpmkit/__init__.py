"""What evaluate.py and finetune.py stand on, one module for each thing (hpm.py, the head, stays
a single torch-only file at the top, to be copied):

    cli         one-line errors, the flags' checks, progress; the installed commands
    files       atomic writes, the lock on --out, what --out may be
    data        datasets (torchvision, ImageNet folders, .npz, your own), eps per dataset
    models      models (RobustBench names, pickled files, your code with --weights), fingerprints;
                --compile
    checkpoint  the head checkpoint: its one reader and its writer; the models evaluate.py attacks
    config      the flags resolved and checked, resume identity, the fixed subset
    catalogue   the attacks' Setting and the catalogue of attacks (records, with their cost)
    results     the results file's layout: the one module that spells its keys
    pgd         the one PGD step and projection
    attacks     the attacks AutoAttack lacks, and the one way the library's are called
    attackers   K of B: an attacker's slots among benign images, own and collateral
    chunks      many fixed batches at once, each with the random numbers it gets alone
    engine      what evaluate.py's loop stands on: a job's chunks from where the results left off,
                torchrun's share and ledgers, chunks that fit in GPU memory, the plan and progress,
                --save-adv
    checks      the gradient-masking checks and the context sensitivity
    report      notes, tables, the Markdown table and plot beside the results
    controls    the fine-tuning study's controls: NCM, and Adv-DPNP's head, losses and training step
    api         the Python API for notebooks

No module here imports a script (evaluate.py, finetune.py, the experiments).
"""
