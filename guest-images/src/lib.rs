//! Builds the default guest image and the carrier VM from Debian packages.
