/*
 * mvrefresh_capture: lets a capture trigger skip a row before any PL/pgSQL runs.
 *
 * A capture trigger marks a key dirty once per dirty period; after that, every row of that key
 * a session writes has nothing to do. Without this extension the trigger function itself finds
 * that out (its session remembers the keys it marked, in settings), which costs a PL/pgSQL call
 * on every row. With it, each row trigger gets a WHEN clause calling native_unseen_<slot>(new
 * key, old key): it answers from this backend's memory of the keys the trigger marked, and the
 * trigger is not even queued for a row whose keys are all remembered.
 *
 * What is remembered and when it is forgotten:
 *  - native_remember(unseen function, key, generation) records a key; only the trigger function
 *    (mvrefresh's installing role) may call it, and it does so after finding or writing the key's
 *    row in mvrefresh.dirty. Writers cannot write this memory, so they cannot hide a change.
 *  - Keys are compared as the binary image of the typed value, per capture (the unseen
 *    function's own OID identifies the capture: each capture's triggers use their own slot).
 *  - The daemon moves the sequence mvrefresh.generation on whenever it takes dirty keys (and
 *    `mvrefresh install` does, since it may give a slot to another capture): the memory is
 *    checked against it once per statement and trigger (per call site: the WHEN's own function
 *    call state), and dropped when it moved. A statement whose WHEN asks holds its write lock on
 *    the captured table from before the check to the end of its transaction, which is what the
 *    daemon's hand-over guard waits for; so a row skipped on a generation read at the start of
 *    the statement is covered. (Not per transaction: a session could then read the generation
 *    before it writes, holding no such lock, and rely on it after the daemon took its key.)
 *  - An aborted transaction or subtransaction, or a prepared one, drops everything (the dirty row
 *    written with it may be gone). Forgetting is always safe: the next row takes the trigger.
 *  - Bounded: at most MAX_ENTRIES keys and MAX_BYTES of them; past that the memory starts over.
 */
#include "postgres.h"

#include "access/htup_details.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "common/hashfn.h"
#include "fmgr.h"
#include "miscadmin.h"
#include "utils/datum.h"
#include "utils/fmgrprotos.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/syscache.h"

PG_MODULE_MAGIC;

#define TABLE_SLOTS 1024		/* a power of two, twice MAX_ENTRIES */
#define MAX_ENTRIES 512
#define MAX_BYTES (64 * 1024)
#define MAX_KEY_BYTES 1024		/* longer keys always take the trigger */

typedef struct Entry
{
	uint32		hash;
	uint32		len;
	char	   *bytes;			/* capture OID, then the key's image; NULL: empty */
} Entry;

/* Per call site (fn_extra): the key's type, and whether this statement checked the generation. */
typedef struct KeyType
{
	Oid			type;
	int16		typlen;
	bool		typbyval;
	bool		checked;
} KeyType;

static Entry table[TABLE_SLOTS];
static int	entries = 0;
static Size bytes = 0;
static MemoryContext keys_cxt = NULL;
static bool valid = false;		/* the memory belongs to generation `generation` */
static int64 generation = 0;

/* mvrefresh.generation and its owner, looked up once, forgotten on an invalidation of it. */
static Oid	generation_seq = InvalidOid;
static Oid	generation_owner = InvalidOid;

void		_PG_init(void);

static void
forget(void)
{
	if (keys_cxt != NULL)
		MemoryContextReset(keys_cxt);
	memset(table, 0, sizeof(table));
	entries = 0;
	bytes = 0;
	valid = false;
}

static void
xact_callback(XactEvent event, void *arg)
{
	if (event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_PREPARE)
		forget();
}

static void
subxact_callback(SubXactEvent event, SubTransactionId mySubid,
				 SubTransactionId parentSubid, void *arg)
{
	if (event == SUBXACT_EVENT_ABORT_SUB)
		forget();
}

static void
relcache_callback(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == generation_seq)
		generation_seq = InvalidOid;
}

void
_PG_init(void)
{
	RegisterXactCallback(xact_callback, NULL);
	RegisterSubXactCallback(subxact_callback, NULL);
	CacheRegisterRelcacheCallback(relcache_callback, (Datum) 0);
}

/*
 * The current generation, read as the sequence's owner (writers have no right to read it).
 * False when there is none to read.
 */
static bool
read_generation(int64 *out)
{
	Oid			save_userid;
	int			save_sec_context;
	Datum		value = (Datum) 0;
	bool		isnull = true;

	if (!OidIsValid(generation_seq))
	{
		Oid			nsp = get_namespace_oid("mvrefresh", true);
		Oid			seq;
		HeapTuple	tuple;
		Form_pg_class form;

		if (!OidIsValid(nsp))
			return false;
		seq = get_relname_relid("generation", nsp);
		if (!OidIsValid(seq))
			return false;
		tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(seq));
		if (!HeapTupleIsValid(tuple))
			return false;
		form = (Form_pg_class) GETSTRUCT(tuple);
		if (form->relkind != RELKIND_SEQUENCE)
		{
			ReleaseSysCache(tuple);
			return false;
		}
		generation_owner = form->relowner;
		ReleaseSysCache(tuple);
		generation_seq = seq;
	}

	GetUserIdAndSecContext(&save_userid, &save_sec_context);
	SetUserIdAndSecContext(generation_owner,
						   save_sec_context | SECURITY_LOCAL_USERID_CHANGE |
						   SECURITY_RESTRICTED_OPERATION);
	PG_TRY();
	{
		LOCAL_FCINFO(fcinfo, 1);

		InitFunctionCallInfoData(*fcinfo, NULL, 1, InvalidOid, NULL, NULL);
		fcinfo->args[0].value = ObjectIdGetDatum(generation_seq);
		fcinfo->args[0].isnull = false;
		value = pg_sequence_last_value(fcinfo);
		isnull = fcinfo->isnull;
	}
	PG_FINALLY();
	{
		SetUserIdAndSecContext(save_userid, save_sec_context);
	}
	PG_END_TRY();
	if (isnull)
		return false;
	*out = DatumGetInt64(value);
	return true;
}

/* Drops the memory if the generation moved on. */
static void
check_generation(void)
{
	int64		current;

	if (!read_generation(&current))
		forget();
	else if (!valid || current != generation)
	{
		forget();
		generation = current;
		valid = true;
	}
}

static KeyType *
key_type(FunctionCallInfo fcinfo, int argno)
{
	KeyType    *kt = (KeyType *) fcinfo->flinfo->fn_extra;
	Oid			type = get_fn_expr_argtype(fcinfo->flinfo, argno);

	if (kt == NULL)
	{
		kt = MemoryContextAllocZero(fcinfo->flinfo->fn_mcxt, sizeof(KeyType));
		fcinfo->flinfo->fn_extra = kt;
	}
	if (kt->type != type || !OidIsValid(type))
	{
		if (!OidIsValid(type))
			elog(ERROR, "mvrefresh_capture: cannot tell the type of a key");
		get_typlenbyval(type, &kt->typlen, &kt->typbyval);
		kt->type = type;
	}
	return kt;
}

/*
 * The key's entry: the capture's OID then the value's binary image, in buf. False when the
 * value has no image worth remembering (too long, compressed or out of line).
 */
static bool
key_image(Oid capture, Datum value, KeyType *kt, char *buf, uint32 *len)
{
	const char *data;
	Size		size;

	if (kt->typbyval)
	{
		data = (const char *) &value;
		size = sizeof(Datum);
	}
	else if (kt->typlen == -1)
	{
		struct varlena *v = (struct varlena *) DatumGetPointer(value);

		if (VARATT_IS_EXTERNAL(v) || VARATT_IS_COMPRESSED(v))
			return false;
		data = VARDATA_ANY(v);
		size = VARSIZE_ANY_EXHDR(v);
	}
	else if (kt->typlen > 0)
	{
		data = DatumGetPointer(value);
		size = kt->typlen;
	}
	else
		return false;
	if (size > MAX_KEY_BYTES)
		return false;
	memcpy(buf, &capture, sizeof(Oid));
	memcpy(buf + sizeof(Oid), data, size);
	*len = sizeof(Oid) + size;
	return true;
}

/* The slot holding the entry, or -1 - the empty slot where it would go. */
static int
lookup(const char *key, uint32 len, uint32 hash)
{
	int			i = hash & (TABLE_SLOTS - 1);

	for (;;)
	{
		Entry	   *e = &table[i];

		if (e->bytes == NULL)
			return -1 - i;
		if (e->hash == hash && e->len == len && memcmp(e->bytes, key, len) == 0)
			return i;
		i = (i + 1) & (TABLE_SLOTS - 1);
	}
}

static bool
remembered(Oid capture, Datum value, KeyType *kt)
{
	char		buf[sizeof(Oid) + MAX_KEY_BYTES];
	uint32		len;

	if (!key_image(capture, value, kt, buf, &len))
		return false;
	return lookup(buf, len, hash_bytes((const unsigned char *) buf, len)) >= 0;
}

/*
 * native_unseen_<slot>(new key, old key): true when the trigger must run, i.e. a non-NULL key
 * of the row is not remembered as dirty under the current generation. (A NULL key marks
 * nothing.) INSERT and DELETE triggers pass their one key twice.
 */
PG_FUNCTION_INFO_V1(mvrefresh_native_unseen);
Datum
mvrefresh_native_unseen(PG_FUNCTION_ARGS)
{
	Oid			capture = fcinfo->flinfo->fn_oid;
	KeyType    *kt = key_type(fcinfo, 0);

	if (!kt->checked)
	{
		check_generation();
		kt->checked = true;
	}
	if (!valid || entries == 0)
		PG_RETURN_BOOL(true);
	if (!PG_ARGISNULL(0) && !remembered(capture, PG_GETARG_DATUM(0), kt))
		PG_RETURN_BOOL(true);
	if (!PG_ARGISNULL(1) &&
		(PG_ARGISNULL(0) ||
		 !datum_image_eq(PG_GETARG_DATUM(0), PG_GETARG_DATUM(1), kt->typbyval, kt->typlen)) &&
		!remembered(capture, PG_GETARG_DATUM(1), kt))
		PG_RETURN_BOOL(true);
	PG_RETURN_BOOL(false);
}

/*
 * native_remember(unseen function, key, generation): the trigger found or wrote the key's row
 * in mvrefresh.dirty, having read `generation` before it looked. Kept only while the
 * generation stays that one.
 */
PG_FUNCTION_INFO_V1(mvrefresh_native_remember);
Datum
mvrefresh_native_remember(PG_FUNCTION_ARGS)
{
	Oid			capture;
	int64		read;
	KeyType    *kt;
	char		buf[sizeof(Oid) + MAX_KEY_BYTES];
	uint32		len;
	uint32		hash;
	int			at;

	if (PG_ARGISNULL(0) || PG_ARGISNULL(1) || PG_ARGISNULL(2))
		PG_RETURN_VOID();
	capture = PG_GETARG_OID(0);
	read = PG_GETARG_INT64(2);
	kt = key_type(fcinfo, 1);
	if (!key_image(capture, PG_GETARG_DATUM(1), kt, buf, &len))
		PG_RETURN_VOID();
	/* Another generation's memory, or a full one: start over. */
	if (!valid || read != generation || entries >= MAX_ENTRIES || bytes + len > MAX_BYTES)
	{
		forget();
		generation = read;
		valid = true;
	}
	hash = hash_bytes((const unsigned char *) buf, len);
	at = lookup(buf, len, hash);
	if (at < 0)
	{
		Entry	   *e = &table[-1 - at];

		if (keys_cxt == NULL)
			keys_cxt = AllocSetContextCreate(TopMemoryContext, "mvrefresh_capture keys",
											 ALLOCSET_SMALL_SIZES);
		e->bytes = MemoryContextAlloc(keys_cxt, len);
		memcpy(e->bytes, buf, len);
		e->len = len;
		e->hash = hash;
		entries++;
		bytes += len;
	}
	PG_RETURN_VOID();
}
