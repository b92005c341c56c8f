/*
 * An empty patch object, for command files that only overwrite variables
 * (V lines) and need no patch code. A translation unit must declare
 * something, so this one declares a type only; the object has no sections
 * of interest and links to an empty image.
 */
typedef int dvisor_empty_patch;
