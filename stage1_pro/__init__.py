"""stage1-pro: train, certify and ship the stage-1 exit classifier of a cascade.

Stage 1 answers ("exits") only when its certified exit policy allows it, keeping
``FNR_exit = FN_exit / (TP_exit + FN_exit)`` under ``target_fnr_exit`` with probability
at least ``1 - delta``; everything else is deferred to stage 2.
"""

__version__ = "0.1.0"
