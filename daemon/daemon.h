/*
 * daemon.h - kvqd as a service: configuration, modules, signals, main loop.
 */
#ifndef KVQ_DAEMON_H
#define KVQ_DAEMON_H

/* Runs the daemon in the foreground; returns the process exit status. */
int kvq_daemon_main(int argc, char **argv);

#endif /* KVQ_DAEMON_H */
