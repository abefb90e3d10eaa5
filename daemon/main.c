/*
 * main.c - kvqd's entry point: a one-shot mode, or the daemon.
 */
#include "config.h"

#include "daemon/daemon.h"
#include "daemon/oneshot.h"

int main(int argc, char **argv)
{
	if (kvq_oneshot_wanted(argc, argv))
		return kvq_oneshot_main(argc, argv);
	return kvq_daemon_main(argc, argv);
}
