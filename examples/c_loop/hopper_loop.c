/*
 * A control loop in C around a policy exported with
 *
 *     python cli.py export --checkpoint runs/hopper-seed0 --target c
 *
 * which writes hopper-c.c, hopper-c.h and hopper-c.json (API prefix hopper_). Build and run (any C99 compiler, libm only):
 *
 *     cc -std=c99 -O3 -fno-math-errno -fno-trapping-math -ffp-contract=fast -I. \
 *        examples/c_loop/hopper_loop.c hopper-c.c -lm -o hopper_loop
 *     ./hopper_loop steps.txt actions.txt
 *
 * Here the "plant" is a file: each line of steps.txt is one env step,
 *
 *     <start> <reward> <o_1> ... <o_S>
 *
 * start = 1 at an episode's first step (the policy is reset there, and the reward is ignored),
 * reward = the reward received for the previous action, o = the raw observation. Each line of
 * actions.txt is the action the policy returned for that step ("%.9g": float32 exactly). On a
 * robot the loop is the same with the sensors in place of fscanf and the actuators in place of
 * fprintf. A policy exported with --out NAME has the prefix NAME_ in place of hopper_.
 */
#include <stdio.h>

#include "hopper-c.h"

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s STEPS_FILE ACTIONS_FILE\n", argv[0]);
        return 2;
    }
    FILE *steps = fopen(argv[1], "r");
    if (!steps) {
        fprintf(stderr, "error: cannot open %s\n", argv[1]);
        return 2;
    }
    FILE *actions = fopen(argv[2], "w");
    if (!actions) {
        fprintf(stderr, "error: cannot write %s\n", argv[2]);
        fclose(steps);
        return 2;
    }

    hopper_state policy; /* everything the policy keeps between steps: no heap, no globals */
    double observation[HOPPER_STATE_DIM];
    float action[HOPPER_ACT_DIM];
    long line = 0;
    int start, status = hopper_reset(&policy, HOPPER_TARGET_RETURN);
    double reward;
    while (fscanf(steps, "%d %lf", &start, &reward) == 2) {
        ++line;
        for (int i = 0; i < HOPPER_STATE_DIM; ++i) {
            if (fscanf(steps, "%lf", &observation[i]) != 1) {
                fprintf(stderr, "error: line %ld: expected %d observation values\n", line, HOPPER_STATE_DIM);
                status = -1;
                break;
            }
        }
        if (status != HOPPER_OK) break;
        if (start && (status = hopper_reset(&policy, HOPPER_TARGET_RETURN)) != HOPPER_OK) break;
        status = hopper_step(&policy, observation, reward, action);
        if (status != HOPPER_OK) break; /* on a robot: hold or stop the actuators */
        for (int j = 0; j < HOPPER_ACT_DIM; ++j) fprintf(actions, j ? " %.9g" : "%.9g", action[j]);
        fputc('\n', actions);
    }
    fclose(steps);
    if (fclose(actions) != 0 && status == HOPPER_OK) status = -1;
    if (status > 0) fprintf(stderr, "error: line %ld: %s\n", line, hopper_error_string(status));
    return status == HOPPER_OK ? 0 : 1;
}
