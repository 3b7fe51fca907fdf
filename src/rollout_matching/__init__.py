"""The pure heart of stage 2 (SPEC §6-§10): token pieces, strict parser, matcher, OT targets,
SerializeAppend / Y_train / supervision masks. Nothing here imports transformers or torch-heavy code
paths; every module is testable on the CPU in milliseconds."""
