/* A module that imports a function no Tandem VM provides: loading it must fail with one
 * clear line, never a crash. Used by the tests. */
__attribute__((import_module("env"), import_name("launch_missiles"))) int launch_missiles(int);

int main(void) { return launch_missiles(3); }
