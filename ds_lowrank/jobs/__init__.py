"""The programs of ds_lowrank, each a module with a ``main`` and a console script:

==============================  ==================================  ==============================
module                          console script                      from a clone
==============================  ==================================  ==============================
``pretrain``                    ``ds-lowrank-pretrain``             ``launch/pretrain.py``
``prepare_data``                ``ds-lowrank-prepare-data``         ``tools/prepare_data.py``
``convert_checkpoint``          ``ds-lowrank-convert-checkpoint``   ``tools/convert_checkpoint.py``
``estimate_memory``             ``ds-lowrank-estimate-memory``      ``tools/estimate_memory.py``
``plot_runs``                   ``ds-lowrank-plot-runs``            ``tools/plot_runs.py``
``export_hf``                   ``ds-lowrank-export-hf``            ``tools/export_hf.py``
==============================  ==================================  ==============================

Pretraining on several processes: ``deepspeed --module ds_lowrank.jobs.pretrain ...``.
"""
