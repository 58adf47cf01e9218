"""What goes to and comes from disk: the atomic writer (``files``), the cache root (``cache``), surgery adapters
as PEFT LoRA folders (``adapter``), stacks of them (``stack``) and the compared methods' saved edits
(``saved_edits``)."""
