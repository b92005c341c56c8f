//! D-Script: the policy language (see docs/dscript.md).
