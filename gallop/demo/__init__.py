"""The demo and evaluation side of gallop, kept apart from the library: built-in generated tasks
(``tasks``), multiple-choice accuracy and the paper's forgetting metrics (``evaluate``), and the end-to-end job
behind ``gallop finetune`` / ``make demo`` (``finetune``). The library (``gallop.*`` outside this folder) never
imports it."""
